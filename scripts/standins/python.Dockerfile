# Stand-in for python:3.11-slim-bookworm where Docker Hub cannot be reached (scripts/compose_smoke.py).
# Built on a debootstrap'ed Debian bookworm (imported as POLAR_STANDIN_BASE): its python3 is 3.11.
ARG STANDIN_BASE=polar-standin/debian:bookworm
FROM ${STANDIN_BASE}
ENV LANG=C.UTF-8
# python-is-python3: the official image has `python`; passwd: the runtime stage adds a user.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-pip python-is-python3 ca-certificates passwd \
    && rm -rf /var/lib/apt/lists/*
# The host's CA bundle: TLS to package registries may be re-signed by a proxy that only it trusts.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
