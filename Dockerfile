# The mii image: workers and Flower. CUDA torch from the PyTorch base image.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /opt/mii
COPY pyproject.toml README.md ./
COPY mii ./mii
RUN pip install --no-cache-dir ".[demo]"
ENV MII_CACHE_DIR=/models
ENTRYPOINT ["mii"]
