from medsyngan.cli import main

main()
