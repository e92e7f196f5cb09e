from backpropagate.cli import main

main()
