"""Files on disk, the ground floor: what every other layer writes and reads through.

    files      atomic writes, regular-file opens that refuse links, temporaries, free space
    lock       one stage at a time per features/<NAME> or models/<NAME>
    artifacts  the JSON records beside each model and the identity check between them

Imports only pipeline.config.
"""
