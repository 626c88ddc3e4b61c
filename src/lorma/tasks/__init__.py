"""Tasks of ``lorma train``: what model class, data and metrics a run uses.

See :mod:`lorma.tasks.base` for the interface and how to add a task; :mod:`lorma.tasks.classification`
is GLUE-style sequence classification and regression.
"""

from lorma.tasks.base import Task, get_task, register_task, task_class, task_names

__all__ = ["Task", "get_task", "register_task", "task_class", "task_names"]
