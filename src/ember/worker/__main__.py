from ember.worker.runtime import main

main()
