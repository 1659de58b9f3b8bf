# CUDA image: vLLM 0.32.0 (CUDA wheel) + crystal-vllm, serving with Crystal-KV by default.
# Not built in this project's CI (no Docker engine, no GPU there); see README "GPU".
#   docker build -t crystal-vllm .
#   docker run --gpus all -p 8000:8000 -v ~/models:/models crystal-vllm /models/MyModel
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/crystal-vllm
COPY pyproject.toml setup.py README.md ./
COPY crystal_vllm ./crystal_vllm
COPY csrc ./csrc
COPY kernels ./kernels
# vLLM (and its CUDA torch) come from the base image; install only this package, built
# against that torch (no build isolation) so the C++ CPU kernels compile too.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && python -c "import crystal_vllm.vllm_ext.plugin"

# Arguments after the image name are appended, e.g.
#   docker run ... crystal-vllm /models/MyModel --kv-budget 1024
# The GPU eviction path is not wired yet (README "Status"): until it is, this entry point
# refuses to start with a message, and `--kv-policy none` serves vanilla vLLM.
ENTRYPOINT ["vllm", "serve", "--kv-policy", "crystal"]
