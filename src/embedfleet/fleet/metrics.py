"""Prometheus figures of the fleet, read from the supervisor at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from embedfleet.fleet.supervisor import InstanceState, Supervisor


class FleetCollector(Collector):
    """``embedfleet_instances{state}``, restarts, failed health checks and ``up`` per instance."""

    def __init__(self) -> None:
        self.supervisor: Supervisor | None = None  # set once the supervisor exists (it needs the gateway first)

    def collect(self) -> Iterator[Metric]:
        """The current figures."""
        supervisor = self.supervisor
        if supervisor is None:
            return
        instances = list(supervisor.instances.values())
        states = GaugeMetricFamily("embedfleet_instances", "Instances by state", labels=["state"])
        for state in InstanceState:
            states.add_metric([state.value], sum(1 for i in instances if i.state == state))
        yield states
        restarts = CounterMetricFamily("embedfleet_instance_restarts", "Automatic restarts", labels=["instance"])
        failures = CounterMetricFamily("embedfleet_health_check_failures", "Failed health checks",
                                       labels=["instance"])
        up = GaugeMetricFamily("embedfleet_instance_up", "1 while the instance is running and healthy",
                               labels=["instance", "model"])
        for i in instances:
            restarts.add_metric([i.name], i.restarts)
            failures.add_metric([i.name], i.failed_checks)
            up.add_metric([i.name, i.spec.pool], 1.0 if i.state == InstanceState.RUNNING else 0.0)
        yield from (restarts, failures, up)
