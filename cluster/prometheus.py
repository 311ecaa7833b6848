"""A Prometheus server scraping the Ray cluster's nodes, for development and tests.

Every Ray node serves its metrics (Ray's, Serve's and ExpertMesh's) on its own metrics export port;
`scrape_targets()` reads them from the live cluster. The targets go into a file_sd JSON file that
Prometheus re-reads, so `refresh_targets()` after a node joins or leaves is all it takes. In
Kubernetes the chart's PodMonitor does this instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from expertmesh.errors import FailedPrecondition, Unavailable

JOB = "expertmesh"


def scrape_targets() -> list[str]:
    """`host:port` of every alive node's metrics export port (needs a connected Ray driver)."""
    import ray

    return sorted(f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}"
                  for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort"))


def prometheus_config(targets_file: Path, scrape_interval_s: float) -> dict:
    return {
        "global": {"scrape_interval": f"{scrape_interval_s:g}s", "evaluation_interval": f"{scrape_interval_s:g}s"},
        "scrape_configs": [{
            "job_name": JOB,
            "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "5s"}],
        }],
    }


@dataclass
class PrometheusServer:
    """`prometheus` on loopback with its own config and storage under `workdir`."""

    port: int = 9090
    scrape_interval_s: float = 5.0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="expertmesh-prometheus-")))
    binary: str = "prometheus"
    _proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def targets_file(self) -> Path:
        return self.workdir / "targets.json"

    def refresh_targets(self, targets: list[str] | None = None) -> list[str]:
        targets = scrape_targets() if targets is None else targets
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": targets, "labels": {"cluster": "local"}}]))
        tmp.replace(self.targets_file)  # atomic: Prometheus never reads half a file
        return targets

    def start(self, targets: list[str] | None = None, timeout_s: float = 30.0) -> PrometheusServer:
        exe = shutil.which(self.binary)
        if exe is None:
            raise FailedPrecondition("prometheus is not installed", field="prometheus",
                                     fix="install it (Debian: apt-get install prometheus) or run without it")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.refresh_targets(targets)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(self.targets_file, self.scrape_interval_s)))
        log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise Unavailable(f"prometheus exited with {self._proc.returncode}",
                                  fix=f"see {self.workdir / 'prometheus.log'} (port {self.port} taken?)")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise Unavailable(f"prometheus was not ready within {timeout_s:g} s", fix=f"see {self.workdir / 'prometheus.log'}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def query(self, expr: str) -> list[dict]:
        """Evaluate an instant PromQL query; returns the result vector (raises on a PromQL error)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as err:
            doc = json.loads(err.read() or b"{}")
            raise ValueError(f"PromQL error in {expr!r}: {doc.get('error', err)}") from None
        if doc.get("status") != "success":
            raise ValueError(f"PromQL error in {expr!r}: {doc.get('error')}")
        return doc["data"]["result"]
