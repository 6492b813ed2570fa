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

// 1 when ScatterTokens can alias hidden_out to hidden (the headers have IPluginV3OneBuildV2), else 0.
TOKENSKIP_API int tokenskip_plugins_supports_aliased_io(void) { return TOKENSKIP_HAS_ALIASED_IO; }

// Switch ScatterTokens' output-to-input alias on (1) or off (0, the default) for the engine builds that
// follow in this process; turn it on only together with PreviewFeature::kALIASED_PLUGIN_IO_10_03.
TOKENSKIP_API void tokenskip_plugins_set_aliased_io(int on) { tokenskip::plugin::setAliasedIo(on != 0); }

// How many times ScatterTokens granted TensorRT the alias (getAliasedInput returned an input) so far.
TOKENSKIP_API int64_t tokenskip_plugins_aliases_granted(void) { return tokenskip::plugin::aliasesGranted(); }
