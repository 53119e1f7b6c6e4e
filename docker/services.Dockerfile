# The stack's other services, built from Debian's own packages on the same base as the worker
# (BASE_IMAGE, default python:3.11-slim, i.e. Debian bookworm): one base to pull or build, and
# well-kept Debian packages for Postgres, Redis, Prometheus and the authenticating proxy (nginx).
# One stage per service: docker-compose.yml picks it with `target:`.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS postgres
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql /docker-entrypoint-initdb.d \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY docker/postgres/entrypoint.sh /usr/local/bin/postgres-entrypoint
COPY docker/postgres/*.sql /docker-entrypoint-initdb.d/
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
ENTRYPOINT ["postgres-entrypoint"]

FROM ${BASE_IMAGE} AS redis
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
USER redis
EXPOSE 6379
# Only pub/sub (status notifications) goes through it: nothing to persist.
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]

FROM ${BASE_IMAGE} AS prometheus
RUN apt-get update && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
COPY docker/prometheus/prometheus.yml /etc/prometheus/prometheus.yml
USER prometheus
EXPOSE 9090
CMD ["prometheus", "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--storage.tsdb.retention.time=30d", "--web.listen-address=:9090"]

FROM ${BASE_IMAGE} AS proxy
# nginx authenticates every request (auth_basic); htpasswd (apache2-utils) hashes the passwords
# from the environment with bcrypt when the container starts.
RUN apt-get update && apt-get install -y --no-install-recommends nginx apache2-utils \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default
COPY docker/proxy/nginx.conf /etc/nginx/nginx.conf
COPY docker/proxy/entrypoint.sh /usr/local/bin/proxy-entrypoint
EXPOSE 8080 8081
ENTRYPOINT ["proxy-entrypoint"]
