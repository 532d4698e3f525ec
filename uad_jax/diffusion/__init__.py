"""Diffusion maths shared by the diffusion methods: schedules, noise, losses, samplers."""
