"""The one thing pyproject.toml cannot say: the native modules (shmserve/_ring.c, the ring's
hot path, and shmserve/_stream.c, the stream transports' ECHO loop)."""
from setuptools import Extension, setup

C11 = ["-std=c11", "-O2", "-Wall", "-Wextra"]

setup(ext_modules=[
    # sem_open/sem_clockwait live in libc on glibc >= 2.34 and in libpthread before it.
    Extension("shmserve._ring", ["shmserve/_ring.c"], extra_compile_args=C11,
              libraries=["pthread"]),
    Extension("shmserve._stream", ["shmserve/_stream.c"], extra_compile_args=C11),
])
