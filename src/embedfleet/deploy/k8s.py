"""``embedfleet deploy k8s``: plain Kubernetes manifests and a kustomization.yaml.

Workers: one Deployment per model pool (``nvidia.com/gpu`` limits on GPUs, CPU requests otherwise;
readiness, liveness and start-up probes on /health; the model cache on a volume), each behind a headless
Service: its DNS name resolves to every ready pod, and the gateways follow it with a ``dns+http://``
upstream. The gateway: a Deployment with a Service, a HorizontalPodAutoscaler and a PodDisruptionBudget;
its settings in a ConfigMap rendered from the config, its keys from a Secret it references. Redis as the
shared cache, and the dashboard and a Prometheus scrape config as ConfigMaps.
"""

from __future__ import annotations

from typing import Any

from embedfleet.deploy import files, monitoring
from embedfleet.deploy.plan import HF_HOME, REDIS_PORT, WORKER_DATA, WORKER_PORT, Cache, Plan, Worker, dns_label

PART_OF = {"app.kubernetes.io/part-of": "embedfleet"}
SECRET = "embedfleet-gateway-secrets"
"""The Secret the gateway reads its keys from (``EMBEDFLEET_GATEWAY_API_KEY``, ``..._ADMIN_KEY``); optional."""
CONFIG = "embedfleet-gateway"
GATEWAY = "embedfleet-gateway"
REDIS = "embedfleet-redis"
RUN_AS = 10001
"""The images' non-root user."""
GATEWAY_REPLICAS = (2, 10)
"""The autoscaler's bounds."""
REDIS_IMAGE = "redis:7-alpine"


def workers_service(pool: str) -> str:
    """The headless Service of a pool's workers (its DNS name)."""
    return dns_label(f"embedfleet-workers-{pool}")


def _meta(name: str, component: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "labels": {**PART_OF, "app.kubernetes.io/component": component}, **extra}


def _selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name}


def _security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}}


def _probes(port: int, path: str, scheme: str = "HTTP", start_s: int = 600) -> dict[str, Any]:
    get = {"httpGet": {"path": path, "port": port, "scheme": scheme}}
    return {"startupProbe": {**get, "periodSeconds": 10, "failureThreshold": max(1, start_s // 10)},
            "readinessProbe": {**get, "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 2},
            "livenessProbe": {**get, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3}}


def _workers(plan: Plan, pool: str, members: list[Worker]) -> list[dict[str, Any]]:
    name = workers_service(pool)
    first = members[0]
    gpu = first.gpu is not None
    threads = next((int(a) for flag, a in zip(first.args, first.args[1:], strict=False) if flag == "--threads"), 1)
    resources = ({"limits": {"nvidia.com/gpu": 1}, "requests": {"cpu": "1", "memory": "4Gi"}} if gpu
                 else {"requests": {"cpu": str(threads), "memory": "1Gi"}})
    container = {
        "name": "worker", "image": plan.image(gpu), "args": first.args,
        "env": [{"name": "HF_HOME", "value": HF_HOME}],
        "ports": [{"name": "http", "containerPort": WORKER_PORT}],
        "resources": resources,
        **_probes(WORKER_PORT, plan.health_path),
        "volumeMounts": [{"name": "model-cache", "mountPath": HF_HOME}, {"name": "data", "mountPath": WORKER_DATA}],
        "securityContext": _security(),
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, "worker"),
        "spec": {"replicas": len(members), "selector": {"matchLabels": _selector(name)},
                 "template": {"metadata": {"labels": {**PART_OF, **_selector(name)}},
                              "spec": {"containers": [container], "securityContext": {"fsGroup": RUN_AS},
                                       "terminationGracePeriodSeconds": 30,
                                       "volumes": [{"name": "model-cache", "emptyDir": {"sizeLimit": "20Gi"}},
                                                   {"name": "data", "emptyDir": {"sizeLimit": "5Gi"}}]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, "worker"),
               "spec": {"clusterIP": "None", "selector": _selector(name),
                        "ports": [{"name": "http", "port": WORKER_PORT, "targetPort": "http"}]}}
    return [deployment, service]


def _gateway(plan: Plan) -> list[dict[str, Any]]:
    port = plan.gateway.port
    scheme = plan.scheme.upper()
    container = {
        "name": "gateway", "image": plan.image(False), "args": ["gateway"],
        "envFrom": [{"configMapRef": {"name": CONFIG}}, {"secretRef": {"name": SECRET, "optional": True}}],
        "ports": [{"name": "http", "containerPort": port}],
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        **_probes(port, plan.health_path, scheme, start_s=60),
        "securityContext": _security(),
    }
    low, high = GATEWAY_REPLICAS
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(GATEWAY, "gateway"),
         "spec": {"replicas": low, "selector": {"matchLabels": _selector(GATEWAY)},
                  "template": {"metadata": {"labels": {**PART_OF, **_selector(GATEWAY)}},
                               "spec": {"containers": [container], "terminationGracePeriodSeconds": 30}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(GATEWAY, "gateway"),
         "spec": {"selector": _selector(GATEWAY), "ports": [{"name": "http", "port": port, "targetPort": "http"}]}},
        {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(GATEWAY, "gateway"),
         "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY},
                  "minReplicas": low, "maxReplicas": high,
                  "metrics": [{"type": "Resource", "resource": {
                      "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(GATEWAY, "gateway"),
         "spec": {"minAvailable": 1, "selector": {"matchLabels": _selector(GATEWAY)}}},
    ]


def _redis() -> list[dict[str, Any]]:
    container = {"name": "redis", "image": REDIS_IMAGE, "args": ["--save", "", "--appendonly", "no"],
                 "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                 "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
                 "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10},
                 "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}}}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(REDIS, "cache"),
         "spec": {"replicas": 1, "selector": {"matchLabels": _selector(REDIS)},
                  "template": {"metadata": {"labels": {**PART_OF, **_selector(REDIS)}},
                               "spec": {"containers": [container]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(REDIS, "cache"),
         "spec": {"selector": _selector(REDIS), "ports": [{"name": "redis", "port": REDIS_PORT,
                                                           "targetPort": "redis"}]}},
    ]


def render(plan: Plan) -> dict[str, str]:
    """The files, by path relative to the output folder."""
    cache = plan.cache(redis_host=REDIS, shared=True)
    if cache.kind == "qdrant":
        cache = Cache("qdrant", plan.gateway.cache)
        plan.notes.append(f"Qdrant is not deployed: the gateways use {plan.gateway.cache} as configured")
    upstreams = plan.upstreams({pool: f"dns+http://{workers_service(pool)}:{WORKER_PORT}" for pool in plan.pools})
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(CONFIG, "gateway"),
              "data": plan.gateway_settings_env(upstreams, cache)}
    manifests: dict[str, list[dict[str, Any]]] = {
        f"workers-{dns_label(pool)}.yaml": _workers(plan, pool, members) for pool, members in plan.pools.items()}
    manifests["gateway.yaml"] = [config, *_gateway(plan)]
    if cache.kind == "redis":
        manifests["redis.yaml"] = _redis()
    scrape = monitoring.prometheus_dns(plan, (GATEWAY, plan.gateway.port),
                                       [(workers_service(pool), WORKER_PORT) for pool in plan.pools])
    manifests["monitoring.yaml"] = [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {**_meta("embedfleet-grafana-dashboard", "monitoring"),
                      "labels": {**PART_OF, "app.kubernetes.io/component": "monitoring", "grafana_dashboard": "1"}},
         "data": {"embedfleet.json": files.to_json(files.dashboard())}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("embedfleet-prometheus", "monitoring"),
         "data": {"prometheus.yml": files.to_yaml(scrape)}},
    ]
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "labels": [{"pairs": PART_OF}], "resources": list(manifests)}
    return {**{name: files.to_yaml(*docs) for name, docs in manifests.items()},
            "kustomization.yaml": files.to_yaml(kustomization), **files.dockerfiles()}
