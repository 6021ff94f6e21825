# Qwen2 Studio: the Gradio app (chat + profiling dashboard) on CPU, or on GPU with a CUDA torch.
#
#   docker build -t qwen2-studio .                                       # model downloads at start-up
#   docker build --build-arg BAKE_MODEL=Qwen/Qwen2-0.5B-Instruct -t qwen2-studio .   # model inside
#   docker run -p 7860:7860 qwen2-studio                                 # http://localhost:7860
#   docker run -p 7860:7860 -v "$PWD/runs:/home/user/app/runs" qwen2-studio   # keep the runs
#   docker run -p 7860:7860 -v qwen2-cache:/home/user/.cache qwen2-studio    # keep downloads and compiled steps
#
# The page opens at once; the CPU decode step compiles in the background into
# ~/.cache/qwen2-studio/inductor (--compile-cache), so a restart with that volume compiles from cache.
#
# TORCH_INDEX_URL picks the torch wheels: CPU-only by default (small image); pass e.g.
# https://download.pytorch.org/whl/cu124 and run with --gpus all for CUDA.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG BAKE_MODEL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/user \
    HF_HOME=/home/user/.cache/huggingface \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    QWEN2_STUDIO_MODEL=${BAKE_MODEL:-Qwen/Qwen2-0.5B-Instruct}

# Inductor compiles the CPU decode step to C++ at start-up (the default fast path on CPU), and int8
# builds our block kernel (qwen2/csrc/): both need a compiler. Without one the app still serves,
# decoding eagerly, int8 with per-channel scales.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

COPY requirements.txt .
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -r requirements.txt

USER 1000
# The runtime first, so a baked model stays cached across changes to the app.
COPY --chown=user:user qwen2/ qwen2/
RUN if [ -n "${BAKE_MODEL}" ]; then \
        python -c "import sys, qwen2.hub; print('baked', qwen2.hub.resolve(sys.argv[1]))" "${BAKE_MODEL}"; \
    fi
COPY --chown=user:user . .
RUN mkdir -p runs

EXPOSE 7860
CMD ["python", "app.py"]
