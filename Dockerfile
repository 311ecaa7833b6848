# The image the Helm chart runs on every Ray pod (head and workers): Ray 2.60.0 (the pinned version) plus ExpertMesh.
# Not built in CI (no Docker engine there); build and push it yourself:
#   docker build -t registry.example/expertmesh:0.1.0 .                                   # CPU
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu --build-arg CONSTRAINTS=constraints-cuda.txt \
#                --build-arg TORCH_INDEX_URL= -t registry.example/expertmesh:0.1.0-gpu .                  # CUDA
# Checkpoints are not baked in: the chart mounts them from a PVC, or an init container builds them (models.source).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

ARG CONSTRAINTS=constraints-cpu.txt
# Where torch's build comes from: PyTorch's CPU index for constraints-cpu.txt (torch==2.13.0+cpu exists only there;
# PyPI has the CUDA build alone for Linux x86_64, so against PyPI alone the CPU constraint cannot be met); empty for
# the CUDA build, which is PyPI's. The Makefile's setup does the same (TORCH_INDEX_URL there).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /opt/expertmesh
COPY --chown=ray:users pyproject.toml setup.py README.md constraints-cpu.txt constraints-cuda.txt ./
COPY --chown=ray:users proto/ proto/
COPY --chown=ray:users expertmesh/ expertmesh/
COPY --chown=ray:users experts/ experts/
COPY --chown=ray:users router/ router/
COPY --chown=ray:users profiler/ profiler/
COPY --chown=ray:users cluster/ cluster/
COPY --chown=ray:users deployments/ deployments/
COPY --chown=ray:users bench/ bench/

# torch first, held to the build the constraints file names (CPU, or CUDA with constraints-cuda.txt); then the
# package (ray[serve] is already the image's, at the same pinned version), whose build generates the gRPC stubs from
# the .proto (setup.py).
ENV PIP_CONSTRAINT=/opt/expertmesh/${CONSTRAINTS} \
    RAY_USAGE_STATS_ENABLED=0 \
    EXPERTMESH_HOME=/models
RUN pip install --no-cache-dir "torch==2.13.0" \
      ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple} \
 && pip install --no-cache-dir . \
 && python -c "import expertmesh.deployments.app, expertmesh.v1.inspection_pb2_grpc"

# Runs as the base image's non-root user `ray` (uid 1000, group `users` gid 100), numerically so Kubernetes'
# runAsNonRoot can check it; the chart's securityContext fixes the same 1000:100. The paths it writes exist and are
# its own: /models (EXPERTMESH_HOME: the zoo; the chart mounts a PVC or an emptyDir there), /tmp/ray (Ray's session
# dir), ~/.ray and ~/.cache. With the chart's read-only root filesystem these are emptyDir mounts (security.writableDirs).
USER root
RUN mkdir -p /models/zoo /tmp/ray /home/ray/.ray /home/ray/.cache \
 && chown -R 1000:100 /models /tmp/ray /home/ray/.ray /home/ray/.cache
USER 1000:100

# Ray's serve (8000), gRPC (9000) and metrics (8080) ports; KubeRay starts Ray with the chart's rayStartParams.
EXPOSE 8000 9000 8080
