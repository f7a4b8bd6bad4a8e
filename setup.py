"""The one thing pyproject.toml cannot say: the ring's native module (shmserve/_ring.c)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "shmserve._ring", ["shmserve/_ring.c"],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"],
    # sem_open/sem_clockwait live in libc on glibc >= 2.34 and in libpthread before it.
    libraries=["pthread"],
)])
