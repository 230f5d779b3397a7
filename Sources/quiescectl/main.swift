print("quiescectl")
