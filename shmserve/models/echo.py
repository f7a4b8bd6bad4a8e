"""The model-less server: the dispatcher answers ECHO and METADATA for every model."""
from shmserve import Model


class EchoModel(Model):
    name = "echo"
