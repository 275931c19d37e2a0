#!/usr/bin/env python3
"""Write docker/grafana/dashboards/weir.json: a Grafana dashboard over the focus's metrics
(docs/metrics.md). Edit the panels here and run it again; docker/stack-test.sh runs every
query against the stack's Prometheus, so a renamed metric shows up as a failure there."""
import json
import pathlib

DS = {"type": "prometheus", "uid": "weir-prometheus"}
q50 = "histogram_quantile(0.5, sum by (le) (rate(weir_forwarding_delay_seconds_bucket[1m])))"
q99 = "histogram_quantile(0.99, sum by (le) (rate(weir_forwarding_delay_seconds_bucket[1m])))"
PANELS = [
    # title, type, [(query, legend)], unit, width
    ("Participants and conferences", "timeseries",
     [("weir_participants", "participants"), ("weir_conferences", "conferences"),
      ("weir_ice_tcp_connections", "on ICE-TCP")], "short", 12),
    ("Draining", "stat", [("weir_draining", "draining")], "short", 4),
    ("Invite to answer p95", "stat",
     [("histogram_quantile(0.95, sum by (le) (rate(weir_invite_to_answer_seconds_bucket[5m])))", "p95")],
     "s", 8),
    ("Media in / out", "timeseries",
     [("rate(weir_bytes_in_total[1m]) * 8", "in"), ("rate(weir_bytes_out_total[1m]) * 8", "out")],
     "bps", 12),
    ("RTP packets forwarded / received", "timeseries",
     [("rate(weir_rtp_packets_forwarded_total[1m])", "forwarded"),
      ("rate(weir_rtp_packets_in_total[1m])", "received")], "pps", 12),
    ("Forwarding delay (datagram in to copies out)", "timeseries",
     [(q50, "p50"), (q99, "p99")], "s", 12),
    ("Focus CPU and memory", "timeseries",
     [("rate(process_cpu_seconds_total[1m])", "CPU (cores)"),
      ("process_resident_memory_bytes / 2^30", "RSS (GiB)")], "short", 12),
    ("Drops by reason", "timeseries",
     [("sum by (reason) (rate(weir_media_dropped_total[1m]))", "{{reason}}"),
      ("rate(weir_udp_receive_drops_total[1m])", "kernel receive buffer")], "pps", 12),
    ("Adaptation", "timeseries",
     [("weir_videos_paused", "videos paused"), ("weir_layers_off", "layers off (dynacast)"),
      ("rate(weir_temporal_skipped_packets_total[1m])", "temporal skipped /s"),
      ("rate(weir_keyframe_requests_total[1m])", "keyframe requests /s")], "short", 12),
    ("Legs ended / refused", "timeseries",
     [("sum by (reason) (rate(weir_legs_closed_total[5m])) * 60", "ended {{reason}} /min"),
      ("sum by (reason) (rate(weir_legs_refused_total[5m])) * 60", "refused {{reason}} /min")],
     "short", 12),
    ("Cascading trunks", "timeseries",
     [("sum by (side) (weir_trunks)", "trunks {{side}}"),
      ("rate(weir_trunk_payload_bytes_out_total[1m]) * 8", "payload out bit/s"),
      ("rate(weir_trunk_payload_bytes_in_total[1m]) * 8", "payload in bit/s")], "short", 12),
]


def main():
    panels, x, y, row_h = [], 0, 0, 0
    for pid, (title, kind, queries, unit, width) in enumerate(PANELS, start=1):
        height = 4 if kind == "stat" else 8
        if x + width > 24:
            x, y, row_h = 0, y + row_h, 0
        panels.append({
            "id": pid, "title": title, "type": kind, "datasource": DS,
            "gridPos": {"x": x, "y": y, "w": width, "h": height},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
            "targets": [{"refId": chr(65 + i), "expr": q, "legendFormat": legend, "datasource": DS}
                        for i, (q, legend) in enumerate(queries)],
        })
        x, row_h = x + width, max(row_h, height)
    dashboard = {
        "uid": "weir-focus", "title": "weir focus", "tags": ["weir"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"}, "panels": panels,
        "description": "Built on the metrics in docs/metrics.md. Regenerate with "
                       "docker/grafana/make-dashboard.py.",
    }
    out = pathlib.Path(__file__).parent / "dashboards" / "weir.json"
    out.write_text(json.dumps(dashboard, indent=1) + "\n")


if __name__ == "__main__":
    main()
