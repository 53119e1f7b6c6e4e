"""Cheap checks of the deployment files (the stack itself runs in test_compose_stack.py, marker
``compose``): every configuration variable reaches the containers, and production migrations
touch only this project's own tables."""

import re
from pathlib import Path

import yaml
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect

from flux_dagster.cli import main
from flux_dagster.db.models import AppBase, OwnBase

REPO = Path(__file__).resolve().parents[1]


def readme_variables() -> set[str]:
    """The variables named in the first column of the README's configuration table."""
    section = REPO.joinpath("README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_column = line.split("|")[1]
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_column))
            # `DAGSTER_PG_HOST`, `_PORT`, …: the suffixes share the first name's prefix.
            prefix = re.match(r"\| `([A-Z0-9]+_[A-Z0-9]+)_", line)
            names |= {prefix.group(1) + s for s in re.findall(r"`(_[A-Z0-9_]+)`", first_column)} if prefix else set()
    return names


def test_every_readme_variable_reaches_the_worker_containers():
    compose = yaml.safe_load(REPO.joinpath("docker", "docker-compose.yml").read_text())
    # DAGSTER_HOME and FLUX_HOME are the image's own (volumes are mounted there).
    expected = readme_variables() - {"DAGSTER_HOME", "FLUX_HOME"}
    assert {"FLUX_DATABASE_URL", "DAGSTER_PG_PORT", "GENAI_API_KEY", "FLUX_SQLQUERIER_ALLOWED_HOSTS"} <= expected
    for service in ("flux_dagster_user_code", "flux_dagster_daemon", "flux_dagster_metrics"):
        environment = compose["services"][service]["environment"]
        assert expected <= set(environment), (
            f"add to x-flux-env in docker/docker-compose.yml: {sorted(expected - set(environment))}")
    for service in ("flux_dagster_webserver", "flux_dagster_webserver_readonly"):
        assert {n for n in expected if n.startswith("DAGSTER_PG")} <= set(compose["services"][service]["environment"])


def test_the_ui_is_reached_only_through_the_authenticating_proxy():
    services = yaml.safe_load(REPO.joinpath("docker", "docker-compose.yml").read_text())["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"flux_dagster_proxy", "flux_dagster_prometheus"}
    assert "FLUX_UI_ADMIN_PASSWORD:?" in REPO.joinpath("docker", "docker-compose.yml").read_text()


def test_migrate_creates_only_our_own_tables(tmp_path):
    url = f"sqlite:///{tmp_path / 'app.db'}"
    result = CliRunner().invoke(main, ["migrate"], env={"FLUX_DATABASE_URL": url})
    assert result.exit_code == 0, result.output
    tables = set(inspect(create_engine(url)).get_table_names())
    assert set(OwnBase.metadata.tables) <= tables
    assert not tables & set(AppBase.metadata.tables)


def test_resources_are_built_once_with_their_secrets_read_from_the_environment_and_kept_out_of_the_ui(monkeypatch):
    from dagster import build_resources

    from flux_dagster.resources import build_resources as flux_resources
    from flux_dagster.resources import built_once

    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    definitions = built_once(flux_resources())
    llm = definitions["llm"]
    assert "sk-very-secret" not in llm.description and "OPENAI_API_KEY" in llm.description
    assert "http://127.0.0.1:9/v1" in llm.description  # the settings that are not secrets are shown
    with build_resources({"llm": llm}) as first, build_resources({"llm": llm}) as second:
        assert first.llm is second.llm  # one object for every run, not one built per run
        assert first.llm.openai_api_key == "sk-very-secret"
