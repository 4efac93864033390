from contrastive_cli.cli import main

raise SystemExit(main())
