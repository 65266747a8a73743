"""The three trivial steps of the ``bench3`` routine, the same flow as the Node-RED
peer (step1 a=1, step2 b=a+1, step3 c=b+1): the benchmark measures flowd, not the task."""

from flowd.task import Task


class Step1(Task):
    """a = 1"""

    def perform(self, *args, **kwargs):
        return args, {**kwargs, "a": 1}


class Step2(Task):
    """b = a + 1"""

    def perform(self, *args, **kwargs):
        return args, {**kwargs, "b": kwargs["a"] + 1}


class Step3(Task):
    """c = b + 1"""

    def perform(self, *args, **kwargs):
        return args, {**kwargs, "c": kwargs["b"] + 1}
