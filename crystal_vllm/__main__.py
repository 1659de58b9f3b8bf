from crystal_vllm.cli import main

raise SystemExit(main())
