// Entry points TensorRT looks up when it loads libtokenskip_plugins.so
// (IPluginRegistry::loadLibrary / plugins_to_serialize): getCreators and setLoggerFinder.
#include <NvInferRuntime.h>

#include "common/plugin_common.h"
#include "common/tokenskip_kernels.h"
#include "scatter_tokens/scatter_tokens_plugin.h"
#include "topk_gather/topk_gather_plugin.h"

#ifndef TOKENSKIP_SOURCE_HASH
#define TOKENSKIP_SOURCE_HASH "unknown"
#endif

namespace {
tokenskip::plugin::TopKGatherCreator gTopKGatherCreator;
tokenskip::plugin::ScatterTokensCreator gScatterTokensCreator;
nvinfer1::IPluginCreatorInterface* gCreators[] = {&gTopKGatherCreator, &gScatterTokensCreator};
} // namespace

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    tokenskip::plugin::setLoggerFinder(finder);
}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    nbCreators = static_cast<int32_t>(sizeof(gCreators) / sizeof(gCreators[0]));
    return gCreators;
}

TOKENSKIP_API const char* tokenskip_plugins_source_hash(void) { return TOKENSKIP_SOURCE_HASH; }
