"""What a node of an ExpertMesh cluster declares, by name: the labels and the custom resource the planner reads
and the deployments pin replicas with (the local cluster, the Helm chart's worker groups and `ray start` all set them).
"""

NODE_LABEL = "expertmesh.io/node"  # the node's name; a plan's placement names nodes by it
POOL_LABEL = "expertmesh.io/pool"  # a pool of alike nodes (a factory or a GPU type)
MEMORY_RESOURCE = "expertmesh_memory_mib"  # device memory the node offers experts, MiB (a Ray custom resource)
