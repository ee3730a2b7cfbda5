from fastrlhf.cli import main

raise SystemExit(main())
