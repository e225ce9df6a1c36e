from cnnjax.cli import main

raise SystemExit(main())
