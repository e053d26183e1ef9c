// Stand-in for TensorRT's NvInferPlugin.h (see NvInfer.h in this folder).
#pragma once

#include "NvInfer.h"

inline bool initLibNvInferPlugins(void*, char const*) { return true; }
