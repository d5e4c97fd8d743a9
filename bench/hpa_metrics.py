"""HPA metrics from a live scrape: a mesh under load, a real Prometheus with the shipped scrape job, then each HPA
metric's Prometheus Adapter query exactly as the adapter renders it (the closing note of issue 13 quotes its output).

    .venv/bin/python -m bench.hpa_metrics        # ~70 s; needs Redis and Debian's prometheus on PATH

24 concurrent Asks (bypass_cache) for 45 s against the sim LLM (TTFT 300 ms, 50 tokens at 50/s), so streams stay
open long enough for generation's saturation and the gateway's in-flight gauge to read above zero.
"""
import json, subprocess, tempfile, threading, time, urllib.request, urllib.parse, uuid, random
from pathlib import Path
import grpc, yaml
from services.cli.mesh import LocalMesh, free_port
from services.cli.ingest import ingest_path
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc
from tests.integration.conftest import start_sim_llm, stop_process
from tests.integration import test_prometheus as tp
from tests.contract._metrics import adapter_rules, hpa_pod_metrics, render_adapter_query, rule_metric_name, SERVICES

sim = start_sim_llm(ttft_ms=300, tokens_per_second=50, max_tokens=50, failure_rate=0, hang_rate=0)
tmp = Path(tempfile.mkdtemp())
prefix = f"ragfleet-note:{uuid.uuid4().hex[:8]}:gw:"
mesh = LocalMesh(data_dir=tmp / "mesh", env={"RAGFLEET_LLM_BASE_URL": sim.base_url, "RAGFLEET_LLM_MODEL": "sim-llm",
    "RAGFLEET_REDIS_URL": "redis://127.0.0.1:6379/0", "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix,
    "RAGFLEET_GATEWAY_CORPUS_VERSION_KEY": prefix + "version:{tenant}", "RAGFLEET_GATEWAY_API_KEYS": "",
    "RAGFLEET_LOG_LEVEL": "WARNING", "RAGFLEET_GENERATION_MAX_CONCURRENT": "256"})
prom = None
try:
    mesh.start()
    ingest_path(mesh.address("gateway"), str(tp.CORPUS), show_progress=False)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(tp._render_config(mesh), sort_keys=False))
    port = free_port()
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp/'prometheus.yml'}", f"--storage.tsdb.path={tmp/'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event(); counts = {"ok": 0, "err": 0}
    def worker(i):
        rng = random.Random(i)
        with grpc.insecure_channel(mesh.address("gateway")) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    for _ in stub.Ask(gateway_pb2.AskRequest(question=f"{rng.choice(tp.QUESTIONS)} {i}-{n}", top_k=3, bypass_cache=True), timeout=30):
                        pass
                    counts["ok"] += 1
                except grpc.RpcError:
                    counts["err"] += 1
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    started = time.time()
    for t in threads: t.start()
    time.sleep(45)
    print(f"load: 24 concurrent Asks (bypass_cache, sim LLM ttft 300 ms, 50 tokens at 50/s), {time.time()-started:.0f} s, "
          f"{counts['ok']} Asks ok, {counts['err']} errors; queried at {time.strftime('%H:%M:%S')}")
    for service, metric in hpa_pod_metrics():
        (rule,) = [r for r in adapter_rules() if rule_metric_name(r) == metric]
        q = render_adapter_query(rule, "ragfleet", [f"{service}-0"])
        with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": q}), timeout=10) as r:
            res = json.loads(r.read())["data"]["result"]
        print(f"{service} {metric}\n  query: {q}\n  result: {[(s['metric'], s['value'][1]) for s in res]}")
    stop.set()
    for t in threads: t.join(35)
finally:
    if prom: stop_process(prom)
    mesh.stop(); stop_process(sim.process)
