print("quiesced")
