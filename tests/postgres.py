"""A real, throwaway PostgreSQL server for the production-profile tests.

Debian's binaries (`.ci/run` installs the `postgresql` package when they are missing); the
cluster lives in a temp folder with its unix socket there too, listens on 127.0.0.1 on a free
port, trusts local connections and runs without fsync (it is deleted afterwards). PostgreSQL
refuses to run as root, so as root the server runs as the user `nobody`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def pg_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    bindir: Path
    root: Path
    port: int
    user: str = "zoetrope"

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _as_server_user(self, cmd: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return cmd
        return ["runuser", "-u", "nobody", "--", *cmd]

    def start(self) -> "Postgres":
        if os.geteuid() == 0:  # the server's user must own its folder
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        self.root.chmod(0o700)
        run = dict(check=True, capture_output=True, text=True, timeout=300)
        subprocess.run(self._as_server_user(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
             "-E", "UTF8", "--no-sync", "--no-instructions"]), **run)
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(self._as_server_user(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
             "-o", options, "-w", "-t", "240", "start"]), **run)
        return self

    def create_database(self, name: str) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname=database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._as_server_user(
                [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                capture_output=True, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> Postgres:
    """Start a server, or raise LookupError saying why none can run here."""
    bindir = pg_bindir()
    if bindir is None:
        raise LookupError("PostgreSQL binaries (initdb, pg_ctl) not found: install Debian's `postgresql` "
                          "package (.ci/run does when it runs as root with apt)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        raise LookupError("running as root without `runuser`: PostgreSQL refuses to run as root")
    # /tmp, not pytest's tmp_path: `nobody` must be able to reach the folder.
    root = Path(tempfile.mkdtemp(prefix="zoetrope-pg-", dir="/tmp"))
    pg = Postgres(bindir, root, _free_port())
    try:
        return pg.start()
    except subprocess.CalledProcessError as exc:
        log = (root / "server.log").read_text(errors="replace")[-2000:] if (root / "server.log").exists() else ""
        pg.stop()
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr or exc.stdout} {log}") from None
