"""HPA metrics from a live scrape: a mesh under load, a real Prometheus with the shipped scrape job, then each HPA
metric's Prometheus Adapter query exactly as the adapter renders it (the closing note of issue 13 quotes its output).

    .venv/bin/python -m bench.hpa_metrics        # ~70 s; needs Redis and Debian's prometheus on PATH

24 concurrent Asks (bypass_cache) for 45 s against the sim LLM (TTFT 300 ms, 50 tokens at 50/s), so streams stay
open long enough for generation's saturation and the gateway's in-flight gauge to read above zero.
"""
import json, subprocess, tempfile, threading, time, urllib.request, urllib.parse, uuid, random
from pathlib import Path
import grpc, yaml
from bench._common import QUESTIONS, REDIS_URL, SAMPLE_CORPUS
from services.cli.ask import auth_metadata
from services.cli.ingest import ingest_path
from services.cli.mesh import LocalMesh, free_port
from services.cli.sim_llm import SimLLMProcess
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc
from tests.contract._metrics import adapter_rules, hpa_pod_metrics, render_adapter_query, rule_metric_name, scrape_config

sim = SimLLMProcess(ttft_ms=300, tokens_per_second=50, max_tokens=50, failure_rate=0, hang_rate=0)
tmp = Path(tempfile.mkdtemp())
run = uuid.uuid4().hex[:8]
prefix, key, tenant = f"ragfleet-note:{run}:gw:", f"key-{run}", f"hpa-{run}"
# A tenant of this run's own: the corpus version retrieval advances on ingest (runtime.corpus_version's key, which has
# no per-run prefix) is then this run's alone.
mesh = LocalMesh(data_dir=tmp / "mesh", env={"RAGFLEET_LLM_BASE_URL": sim.base_url, "RAGFLEET_LLM_MODEL": "sim-llm",
    "RAGFLEET_REDIS_URL": REDIS_URL, "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix,
    "RAGFLEET_GATEWAY_API_KEYS": f"{key}={tenant}",
    "RAGFLEET_LOG_LEVEL": "WARNING", "RAGFLEET_GENERATION_MAX_CONCURRENT": "256"})
prom = None
try:
    mesh.start()
    ingest_path(mesh.address("gateway"), str(SAMPLE_CORPUS), api_key=key, show_progress=False)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(scrape_config(mesh, "ragfleet"), sort_keys=False))
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
                    for _ in stub.Ask(gateway_pb2.AskRequest(question=f"{rng.choice(QUESTIONS)} {i}-{n}", top_k=3, bypass_cache=True),
                                       metadata=auth_metadata(key), timeout=30):
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
    if prom:
        prom.terminate()
        try: prom.wait(10)
        except subprocess.TimeoutExpired: prom.kill(); prom.wait()
    mesh.stop(); sim.stop()
