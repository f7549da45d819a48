# curate on a CUDA machine. Build: docker build -t curate .   Run: docker run --gpus all -v $PWD:/data curate status -w /data/ws
# torch 2.14.1 and faiss-gpu wheels bring their own CUDA libraries; the host needs a driver for CUDA 13.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# g++, protobuf-compiler and libprotobuf-dev build gcld3 (the `datacomp` extra); wordnet-base is the
# WordNet 3.0 database DataComp's text_based baseline reads.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
        libjpeg-turbo8 ca-certificates g++ protobuf-compiler libprotobuf-dev wordnet-base \
        && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV

WORKDIR /opt/curate
COPY pyproject.toml README.md ./
COPY curate ./curate
COPY pipelines ./pipelines
# The `gpu` extra brings faiss-gpu. faiss-cpu (a base dependency) installs the same `faiss`
# package directory, so remove both and reinstall faiss-gpu alone to leave only the GPU build.
RUN pip install ".[gpu,ray,datacomp]" \
    && pip uninstall -y faiss-cpu faiss-gpu \
    && pip install --no-deps "faiss-gpu==1.15.1" \
    && python -c "import curate, faiss, torch; print('faiss GPUs:', faiss.get_num_gpus())"

ENTRYPOINT ["curate"]
CMD ["--help"]
