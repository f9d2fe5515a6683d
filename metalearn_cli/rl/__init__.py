"""Reinforcement learning as one more kind of task: environments vectorised over tasks and episodes
(`env`, `nav2d`), the collection of episodes by a Gaussian policy (`rollouts`), the linear feature
baseline (`baseline`) and generalised advantage estimation (`advantages`). `tasks.episodes.EpisodeTasks`
turns them into the losses and metrics algorithms ask for."""
