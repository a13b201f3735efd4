"""The report stage: report.json's one definition, report.html and story.jpg, the challenge submission."""
