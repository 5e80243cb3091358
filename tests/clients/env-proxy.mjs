// Makes Node's own fetch honour HTTPS_PROXY / NO_PROXY, as Node 24's NODE_USE_ENV_PROXY=1
// does built in. Loaded with NODE_OPTIONS="--import <this file>": the client is unchanged.
import { EnvHttpProxyAgent, setGlobalDispatcher } from "undici";

setGlobalDispatcher(new EnvHttpProxyAgent());
