"""The model-less server: echo only (the dispatcher answers ECHO for every model)."""
from . import Model


class EchoModel(Model):
    name = "echo"


def build(args) -> Model:
    return EchoModel()
