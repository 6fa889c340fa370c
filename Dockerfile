# kvgate gateway image. CPU torch by default; on GPU hosts build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY gateway gateway
COPY tiers tiers
COPY coherence coherence
COPY loadtest loadtest
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" -c constraints.txt . \
    && useradd --system --create-home kvgate && mkdir -p /data && chown kvgate /data
USER kvgate
EXPOSE 8080
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz'); sys.exit(0)"
ENTRYPOINT ["kvgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
