"""The Ray layer: one package per job (train/, tune/, serve/, batch/) over the Ray-free core.

Importing it sets Ray's environment defaults before any of its modules imports Ray (see cluster.py), so an
entry point that imports the Ray layer first never starts a Ray that listens beyond loopback.
"""

from dinomaly.distributed.cluster import set_ray_environment

set_ray_environment()
