import sys

if any(a.startswith("--emulate-link") for a in sys.argv[1:]):  # the consumer-GPU regime, emulated
    from .link_bench import main
else:
    from .offload_bench import main

sys.exit(main())
