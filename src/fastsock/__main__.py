from fastsock.cli import main

main()
