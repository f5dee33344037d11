"""Built-in tasks: a model, its prompts and its rewards, small enough to train on a CPU."""

#: task name -> the module that implements it (``precise-rl pretrain TASK`` lists these)
TASKS: dict[str, str] = {"digits": "precise_rl.tasks.digits"}

__all__ = ["TASKS"]
