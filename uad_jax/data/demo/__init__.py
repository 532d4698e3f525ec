"""The bundled synthetic demo cohort (spec `demo_cohort.md`), generated from nilearn's MNI152
template: anatomy, contrasts, lesions and scanner recipes, and the cohort writer (`cohort.py`).
"""
