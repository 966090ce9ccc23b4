#!/usr/bin/env bash
# Create (or update) the databases and users of MLflow and Optuna in one PostgreSQL server:
#   database mlflow, owned by user mlflow  (the MLflow tracking server's backend store)
#   database optuna, owned by user optuna  (Optuna's RDB storage for sweeps)
# Passwords come from the environment only: MLFLOW_DB_PASSWORD and OPTUNA_DB_PASSWORD (required).
#
# Runs by itself in the postgres image's /docker-entrypoint-initdb.d (first start on an empty data
# directory: postgres/postgres.yaml and mlflow/docker-compose.yaml mount it there), or by hand against
# any server, e.g. a managed one:
#   PGHOST=db.example.internal PGUSER=admin PGPASSWORD=... MLFLOW_DB_PASSWORD=... OPTUNA_DB_PASSWORD=... \
#       bash infra/cluster/postgres/init-databases.sh
# Safe to run again: it creates what is missing and resets the two passwords.
set -euo pipefail

: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD (password of the mlflow user)}"
: "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD (password of the optuna user)}"

# Inside the postgres image's entrypoint POSTGRES_USER is the superuser and the server listens on its
# socket only; by hand, the PG* variables (PGHOST, PGUSER, PGPASSWORD, PGPORT) say where to go.
psql_args=(-v ON_ERROR_STOP=1 --no-psqlrc --dbname "${POSTGRES_DB:-postgres}")
if [[ -n "${POSTGRES_USER:-}" ]]; then
    psql_args+=(--username "$POSTGRES_USER")
fi

# The passwords go from the environment into psql variables (\getenv, psql 15 or newer) and into the
# SQL as quoted literals (:'name'): never on a command line that `ps` shows, any character allowed.
psql "${psql_args[@]}" <<'SQL'
\getenv mlflow_password MLFLOW_DB_PASSWORD
\getenv optuna_password OPTUNA_DB_PASSWORD
SELECT 'CREATE ROLE mlflow LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow') \gexec
SELECT 'CREATE ROLE optuna LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'optuna') \gexec
ALTER ROLE mlflow WITH LOGIN PASSWORD :'mlflow_password';
ALTER ROLE optuna WITH LOGIN PASSWORD :'optuna_password';
SELECT 'CREATE DATABASE mlflow OWNER mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow') \gexec
SELECT 'CREATE DATABASE optuna OWNER optuna' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'optuna') \gexec
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE optuna FROM PUBLIC;
SQL
echo "init-databases: databases mlflow and optuna ready (users mlflow, optuna)"
