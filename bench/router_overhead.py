"""Router overhead: one image through the full router path vs. the expert deployment called directly.

Starts Ray + Serve on loopback with the given zoo, then, interleaving the three paths request by
request so they see the same machine state, sends N chip-resistor images one at a time:
  expert   DeploymentHandle -> chip_defect.classify           (the expert alone)
  router   DeploymentHandle -> Router.inspect                 (classifier + plan + chip_defect)
  grpc     gRPC Inspect through Serve's proxy and the ingress (auth, decode, router, experts)
Prints p50/p99 per path and the differences; writes JSON. Usage:
  python bench/router_overhead.py [--zoo DIR] [-n 200] [--json bench/results/router_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from ray import serve

from expertmesh.deployments import runner
from expertmesh.deployments.auth import write_dev_tokens
from expertmesh.deployments.config import APP_NAME, ROUTER_DEPLOYMENT, AppArgs, ServeSettings
from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.images import encode_png
from expertmesh.experts.spec import default_zoo_root, load_spec
from expertmesh.home import expertmesh_home
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", help="zoo directory of the default spec (default: where `expertmesh zoo build` puts it)")
    ap.add_argument("-n", type=int, default=200, help="requests per path")
    ap.add_argument("--json", default="bench/results/router_overhead.json")
    ap.add_argument("--grpc-port", type=int, default=9000)
    ap.add_argument("--http-port", type=int, default=8000)
    a = ap.parse_args()

    tokens_path = expertmesh_home() / "bench-tokens.yaml"
    tokens = write_dev_tokens(tokens_path, ["bench"])
    zoo = Path(a.zoo) if a.zoo else default_zoo_root(load_spec())
    args = AppArgs(zoo=str(zoo.resolve()), tokens_file=str(tokens_path.resolve()),
                   settings=ServeSettings(grpc_port=a.grpc_port, http_port=a.http_port))
    print("starting Ray + Serve ...", flush=True)
    runner.start(args)
    try:
        expert = serve.get_deployment_handle("chip_defect", app_name=APP_NAME)
        router = serve.get_deployment_handle(ROUTER_DEPLOYMENT, app_name=APP_NAME)
        images = [generator.generate("chip_resistor", "ok", 99, i) for i in range(32)]
        arrays = [np.asarray(im) for im in images]
        pngs = [encode_png(im) for im in images]
        meta = {"component_hint": "", "station_id": "", "factory_id": "bench", "product": ""}
        md = (("authorization", f"Bearer {tokens['bench']}"),)
        times: dict[str, list[float]] = {"expert": [], "router": [], "grpc": []}
        with grpc.insecure_channel(f"127.0.0.1:{a.grpc_port}") as ch:
            stub = pb_grpc.InspectionServiceStub(ch)
            calls = {
                "expert": lambda i: expert.classify.remote(arrays[i % 32]).result(),
                "router": lambda i: router.inspect.remote(arrays[i % 32], meta).result(),
                "grpc": lambda i: stub.Inspect(pb.InspectRequest(factory_id="bench", image=pngs[i % 32]), metadata=md),
            }
            for i in range(20):  # warm-up, not counted
                for f in calls.values():
                    f(i)
            for i in range(a.n):
                for name, f in calls.items():
                    t0 = time.perf_counter()
                    f(i)
                    times[name].append((time.perf_counter() - t0) * 1000.0)
                if (i + 1) % 50 == 0:
                    print(f"  {i + 1}/{a.n} requests per path", flush=True)
    finally:
        runner.stop()

    stats = {k: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)), "n": len(v)}
             for k, v in times.items()}
    print(f"\n{'path':<10}{'p50 ms':>10}{'p99 ms':>10}")
    for k, s in stats.items():
        print(f"{k:<10}{s['p50_ms']:>10.2f}{s['p99_ms']:>10.2f}")
    d50 = stats["router"]["p50_ms"] - stats["expert"]["p50_ms"]
    d99 = stats["router"]["p99_ms"] - stats["expert"]["p99_ms"]
    print(f"\nrouter path - expert alone: p50 +{d50:.2f} ms, p99 +{d99:.2f} ms "
          f"(the router path also runs the classifier model: two model calls instead of one)")
    print(f"gRPC ingress - router path: p50 +{stats['grpc']['p50_ms'] - stats['router']['p50_ms']:.2f} ms")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stats": stats, "router_minus_expert_p50_ms": d50, "router_minus_expert_p99_ms": d99}, indent=2))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
