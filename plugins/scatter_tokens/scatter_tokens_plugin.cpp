#include "scatter_tokens_plugin.h"

#include <limits>
#include <new>

#include "scatter_tokens_kernels.h"

using namespace nvinfer1;

namespace tokenskip {
namespace plugin {

namespace {
constexpr char const* kName = "ScatterTokens";
enum Io : int32_t { kHidden = 0, kDelta = 1, kIndex = 2, kOut = 3 };
} // namespace

char const* ScatterTokensPlugin::getPluginName() const noexcept { return kName; }

IPluginV3* ScatterTokensPlugin::clone() noexcept { return new (std::nothrow) ScatterTokensPlugin(); }

int32_t ScatterTokensPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                                int32_t nbInputs) const noexcept {
    if (nbInputs != 3 || nbOutputs != 1) return -1;
    outputTypes[0] = inputTypes[kHidden];
    return 0;
}

int32_t ScatterTokensPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
                                             DimsExprs* outputs, int32_t nbOutputs, IExprBuilder&) noexcept {
    if (nbInputs != 3 || nbOutputs != 1 || inputs[kHidden].nbDims != 3 || inputs[kDelta].nbDims != 3 ||
        inputs[kIndex].nbDims != 2) {
        logError("ScatterTokens: expects hidden [B,S,H], delta [B,k,H] and index [B,k]");
        return -1;
    }
    outputs[0] = inputs[kHidden];  // hidden_out [B,S,H]
    return 0;
}

bool ScatterTokensPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                                    int32_t nbOutputs) noexcept {
    if (nbInputs != 3 || nbOutputs != 1 || pos < 0 || pos > 3) return false;
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    switch (pos) {
    case kHidden: return isHiddenType(d.type);
    case kIndex: return d.type == DataType::kINT32 || d.type == DataType::kINT64;
    default: return d.type == inOut[kHidden].desc.type;  // delta, hidden_out
    }
}

int32_t ScatterTokensPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                             DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
    if (nbInputs != 3 || nbOutputs != 1) return -1;
    auto clash = [](int64_t a, int64_t b) { return a >= 0 && b >= 0 && a != b; };
    Dims const& h = in[kHidden].desc.dims;
    Dims const& d = in[kDelta].desc.dims;
    Dims const& i = in[kIndex].desc.dims;
    if (clash(h.d[0], d.d[0]) || clash(h.d[2], d.d[2]) || clash(d.d[0], i.d[0]) || clash(d.d[1], i.d[1])) {
        logError("ScatterTokens: shapes disagree (hidden [B,S,H], delta [B,k,H], index [B,k])");
        return -1;
    }
    return 0;
}

#if TOKENSKIP_HAS_ALIASED_IO
int32_t ScatterTokensPlugin::getAliasedInput(int32_t outputIndex) noexcept {
    // Only when switched on (plugin_common.h): TensorRT-RTX asks even without the preview feature and
    // then fails the build, so a plain build must hear "no alias" and gets the copy path.
    if (outputIndex != 0 || !aliasedIo()) return -1;
    countAliasGranted();
    logInfo("ScatterTokens: output 0 (hidden_out) aliases input 0 (hidden): in place");
    return kHidden;
}
#endif

size_t ScatterTokensPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
                                             int32_t) const noexcept {
    Dims const& m = inputs[kHidden].max;  // the copy path's inverse map; unused in place
    return scatter::workspaceSize(int(m.d[0]), int(m.d[1]), int(m.d[2]), int(inputs[kDelta].max.d[1]));
}

int32_t ScatterTokensPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                                     void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
    Dims const& hd = inputDesc[kHidden].dims;
    Dims const& dd = inputDesc[kDelta].dims;
    Dims const& id = inputDesc[kIndex].dims;
    int64_t const B = hd.d[0], S = hd.d[1], H = hd.d[2], k = dd.d[1];
    int64_t const maxInt = std::numeric_limits<int32_t>::max();
    if (dd.d[0] != B || dd.d[2] != H || id.d[0] != B || id.d[1] != k || B > maxInt || S > maxInt || H > maxInt) {
        logError("ScatterTokens: runtime shapes do not match (hidden [B,S,H], delta [B,k,H], index [B,k])");
        return -1;
    }
    ElemKind ek;
    IndexKind ik;
    if (!toElemKind(inputDesc[kHidden].type, ek) || !toIndexKind(inputDesc[kIndex].type, ik)) return -1;
    // outputs[0] == inputs[0] when TensorRT honoured getAliasedInput: the in-place kernel runs
    cudaError_t err = scatter::launchScatterTokens(ek, ik, inputs[kHidden], inputs[kDelta], inputs[kIndex], int(B),
                                                   int(S), int(H), int(k), outputs[0], workspace, stream);
    if (err != cudaSuccess) {
        logError(std::string("ScatterTokens: kernel launch failed: ") + cudaGetErrorString(err));
        return -1;
    }
    return 0;
}

PluginFieldCollection const* ScatterTokensPlugin::getFieldsToSerialize() noexcept {
    mFields.set({});
    return mFields.get();
}

// ------------------------------------------------------------------------------------ creator
ScatterTokensCreator::ScatterTokensCreator() { mFields.set({}); }

char const* ScatterTokensCreator::getPluginName() const noexcept { return kName; }

IPluginV3* ScatterTokensCreator::createPlugin(char const*, PluginFieldCollection const*, TensorRTPhase) noexcept {
    return new (std::nothrow) ScatterTokensPlugin();
}

} // namespace plugin
} // namespace tokenskip
