"""scripts/bench: tcptrace's overhead and event loss under connection churn, next to tcpstates.

``runner`` drives the load generator and the tracers (impure: processes, /proc, bpftool);
``report`` turns the measured runs into ratios, verdicts and the markdown table (pure).
"""
