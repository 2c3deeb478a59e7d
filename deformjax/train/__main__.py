from deformjax.train.cli import run

run()
