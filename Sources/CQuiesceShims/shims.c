// Empty translation unit: everything in quiesce_shims.h is static inline.
#include "quiesce_shims.h"
