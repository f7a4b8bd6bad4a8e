"""Training code for shmserve's models. Imports TensorFlow; never needed to serve."""
