// azdistill infrastructure: an Azure Machine Learning workspace and what it needs to run the distillation
// pipelines (components/, pipelines/): storage, Key Vault, Application Insights, a container registry for the
// environments, one user-assigned managed identity for the jobs, CPU and GPU clusters that scale to zero, and
// the teacher endpoint as a workspace connection.
//
// Deploy:  az deployment group create -g <resource-group> -f infra/main.bicep -p baseName=<name> [teacherEndpoint=...]
// Secure defaults: identity-based data access (no storage keys), RBAC Key Vault with purge protection, no
// admin user on the registry, no public IPs or public SSH on compute nodes (they sit in the workspace's managed
// virtual network), TLS 1.2, Application Insights and the Key Vault's and workspace's logs in Log Analytics.

targetScope = 'resourceGroup'

// ------------------------------------------------------------------------------------------------------------
// Parameters

@description('Required. Short name that prefixes every resource (3-12 lower-case letters and digits).')
@minLength(3)
@maxLength(12)
param baseName string

@description('Optional. Region of every resource. Default: the resource group\'s.')
param location string = resourceGroup().location

@description('Optional. VM size of the CPU cluster (validate, synthesize, register).')
param cpuVmSize string = 'Standard_D4s_v3'

@description('Optional. Most nodes of the CPU cluster (the sharded synthesis runs one shard per node).')
@minValue(1)
param cpuMaxNodes int = 4

@description('Optional. VM size of the GPU cluster (finetune, evaluate).')
param gpuVmSize string = 'Standard_NC24ads_A100_v4'

@description('Optional. Most nodes of the GPU cluster (finetune instance_count).')
@minValue(1)
param gpuMaxNodes int = 2

@description('Optional. Idle time before a cluster node is released, ISO 8601. Clusters always scale to zero.')
param idleTimeBeforeScaleDown string = 'PT10M'

@description('Optional. Teacher endpoint URL (an OpenAI-compatible chat completions endpoint). Empty, or teacherKey empty: no connection.')
param teacherEndpoint string = ''

@description('Optional. Teacher API key, stored only in the workspace connection and Key Vault. Empty: add it later.')
@secure()
param teacherKey string = ''

@description('Optional. Expiry of the teacher-key secret, ISO 8601 (e.g. 2027-06-30T00:00:00Z). Default: one year after this deployment, so each deployment moves it on; give a date to keep it fixed.')
param teacherKeyExpiresOn string = dateTimeAdd(utcNow('u'), 'P1Y')

@description('Optional. Name of the workspace connection holding the teacher (azure.teacher_connection in the config).')
param teacherConnectionName string = 'teacher-endpoint'

@description('Optional. Object id of a user or group given the AzureML Data Scientist role on the workspace (to submit).')
param dataScientistPrincipalId string = ''

@description('Optional. Public network access to the workspace and its dependencies (the clients\' side: compute nodes never have public IPs). Disabled needs private endpoints for the clients.')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

@description('Optional. Tags on every resource.')
param tags object = {
  project: 'azdistill'
}

var suffix = uniqueString(resourceGroup().id, baseName)
var names = {
  identity: 'id-${baseName}'
  storage: take('st${baseName}${suffix}', 24)
  keyVault: take('kv-${baseName}-${suffix}', 24)
  logs: 'log-${baseName}'
  insights: 'appi-${baseName}'
  registry: take('cr${baseName}${suffix}', 50)
  workspace: 'mlw-${baseName}'
}
// Built-in role definition ids.
var roles = {
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  acrPull: '7f951dda-4ed3-4680-a7ca-43fe172d538d'
  azureMLDataScientist: 'f6c7c914-8db3-469d-8ca1-694a8f32e121'
}

// ------------------------------------------------------------------------------------------------------------
// Identity: the jobs run as this identity (azure.identity_client_id in the config = output identityClientId)

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: names.identity
  location: location
  tags: tags
}

// ------------------------------------------------------------------------------------------------------------
// Dependencies of the workspace

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: names.logs
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 90
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: names.insights
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    DisableLocalAuth: true
  }
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: public network access is the publicNetworkAccess parameter (default Enabled so `azdistill submit` works from a laptop without a VNet); deploy with publicNetworkAccess=Disabled and private endpoints for production
  // checkov:skip=CKV_AZURE_59: public network access is the publicNetworkAccess parameter (default Enabled so `azdistill submit` works from a laptop without a VNet); deploy with publicNetworkAccess=Disabled and private endpoints for production
  // checkov:skip=CKV_AZURE_43: the name is take('st' + baseName + uniqueString(...), 24): lower-case letters and digits, 3-24 characters; checkov cannot evaluate the expression
  name: names.storage
  location: location
  tags: tags
  sku: {
    name: 'Standard_GZRS'
  }
  kind: 'StorageV2'
  properties: {
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    // Identity-based access only: the workspace's system datastores use the identity, not account keys.
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    publicNetworkAccess: publicNetworkAccess
    encryption: {
      requireInfrastructureEncryption: true
      keySource: 'Microsoft.Storage'
      services: {
        blob: {
          enabled: true
        }
        file: {
          enabled: true
        }
      }
    }
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: publicNetworkAccess == 'Enabled' ? 'Allow' : 'Deny'
    }
  }
}

resource blobServices 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 14
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 14
    }
  }
}

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: public network access is the publicNetworkAccess parameter (default Enabled so `azdistill submit` works from a laptop without a VNet); deploy with publicNetworkAccess=Disabled and private endpoints for production
  // checkov:skip=CKV_AZURE_189: public network access is the publicNetworkAccess parameter (default Enabled so `azdistill submit` works from a laptop without a VNet); deploy with publicNetworkAccess=Disabled and private endpoints for production
  name: names.keyVault
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: publicNetworkAccess
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: publicNetworkAccess == 'Enabled' ? 'Allow' : 'Deny'
    }
  }
}

resource teacherKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(teacherKey)) {
  // checkov:skip=CKV_AZURE_41: attributes.exp is set below (teacherKeyExpiresOn, one year from deployment by default); checkov cannot evaluate the expression
  // checkov:skip=CKV_AZURE_114: contentType is set below; checkov does not read it on a conditional resource
  parent: keyVault
  name: 'teacher-key'
  properties: {
    value: teacherKey
    contentType: 'text/plain'
    attributes: {
      enabled: true
      // Rotate the teacher key at least yearly: the secret stops working after this date. utcNow() is allowed only
      // in a parameter's default, hence the parameter.
      exp: dateTimeToEpoch(teacherKeyExpiresOn)
    }
  }
}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  // checkov:skip=CKV_AZURE_139: public network access is the publicNetworkAccess parameter (default Enabled so `azdistill submit` works from a laptop without a VNet); deploy with publicNetworkAccess=Disabled and private endpoints for production
  name: names.registry
  location: location
  tags: tags
  sku: {
    name: 'Premium'
  }
  properties: {
    adminUserEnabled: false
    publicNetworkAccess: publicNetworkAccess
    zoneRedundancy: 'Enabled'
    dataEndpointEnabled: true
    policies: {
      retentionPolicy: {
        days: 30
        status: 'enabled'
      }
      quarantinePolicy: {
        status: 'enabled'
      }
      trustPolicy: {
        type: 'Notary'
        status: 'enabled'
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// The workspace

resource workspace 'Microsoft.MachineLearningServices/workspaces@2025-06-01' = {
  // checkov:skip=CKV_AZURE_243: public network access is the publicNetworkAccess parameter (default Enabled so `azdistill submit` works from a laptop without a VNet); deploy with publicNetworkAccess=Disabled and private endpoints for production
  name: names.workspace
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    friendlyName: 'azdistill ${baseName}'
    description: 'Distillation pipelines (azdistill): teacher synthesis, student fine-tuning, evaluation.'
    storageAccount: storage.id
    keyVault: keyVault.id
    applicationInsights: insights.id
    containerRegistry: registry.id
    primaryUserAssignedIdentity: identity.id
    // The storage account allows no shared keys, so the system datastores must use the identity. The workspace
    // schema of API version 2024-10-01 lacks this property (Bicep warns BCP037 and it is not that version's
    // contract); 2025-06-01 has it, hence that version for the workspace, its computes and its connection.
    systemDatastoresAuthMode: 'Identity'
    publicNetworkAccess: publicNetworkAccess
    hbiWorkspace: false
    // The clusters run in this Azure-managed virtual network, which is what lets their nodes go without public IPs
    // (enableNodePublicIp: false) with no subnet of our own. Outbound internet stays open: the jobs call the teacher
    // endpoint and fetch packages. Storage, Key Vault and the registry are reached through private endpoints that
    // Azure ML adds to this network.
    managedNetwork: {
      isolationMode: 'AllowInternetOutbound'
    }
  }
  dependsOn: [
    identityOnStorage
    identityOnKeyVault
    identityOnRegistry
  ]
}

resource cpuCluster 'Microsoft.MachineLearningServices/workspaces/computes@2025-06-01' = {
  parent: workspace
  name: 'cpu-cluster'
  location: location
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    computeType: 'AmlCompute'
    disableLocalAuth: true
    properties: {
      vmSize: cpuVmSize
      vmPriority: 'Dedicated'
      scaleSettings: {
        minNodeCount: 0
        maxNodeCount: cpuMaxNodes
        nodeIdleTimeBeforeScaleDown: idleTimeBeforeScaleDown
      }
      remoteLoginPortPublicAccess: 'Disabled'
      // No public IP on the nodes: they reach the internet through the workspace's managed network.
      enableNodePublicIp: false
    }
  }
}

resource gpuCluster 'Microsoft.MachineLearningServices/workspaces/computes@2025-06-01' = {
  parent: workspace
  name: 'gpu-cluster'
  location: location
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    computeType: 'AmlCompute'
    disableLocalAuth: true
    properties: {
      vmSize: gpuVmSize
      vmPriority: 'Dedicated'
      scaleSettings: {
        minNodeCount: 0
        maxNodeCount: gpuMaxNodes
        nodeIdleTimeBeforeScaleDown: idleTimeBeforeScaleDown
      }
      remoteLoginPortPublicAccess: 'Disabled'
      // No public IP on the nodes: they reach the internet through the workspace's managed network.
      enableNodePublicIp: false
    }
  }
}

// The teacher endpoint and its key, kept by the workspace; jobs read it with the identity (never as an input).
resource teacherConnection 'Microsoft.MachineLearningServices/workspaces/connections@2025-06-01' = if (!empty(teacherEndpoint) && !empty(teacherKey)) {
  parent: workspace
  name: teacherConnectionName
  properties: {
    category: 'ApiKey'
    target: teacherEndpoint
    authType: 'ApiKey'
    isSharedToAll: false
    credentials: {
      key: teacherKey
    }
    metadata: {
      purpose: 'azdistill teacher'
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Diagnostics: who read the teacher key, and what the workspace did, kept in Log Analytics

resource keyVaultDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  scope: keyVault
  name: 'to-${names.logs}'
  properties: {
    workspaceId: logs.id
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

resource workspaceDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  scope: workspace
  name: 'to-${names.logs}'
  properties: {
    workspaceId: logs.id
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

// ------------------------------------------------------------------------------------------------------------
// Roles: least privilege for the jobs' identity

resource identityOnStorage 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: storage
  name: guid(storage.id, identity.id, roles.storageBlobDataContributor)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource identityOnKeyVault 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: keyVault
  name: guid(keyVault.id, identity.id, roles.keyVaultSecretsUser)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource identityOnRegistry 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: registry
  name: guid(registry.id, identity.id, roles.acrPull)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.acrPull)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// Jobs register models, read data assets and the teacher connection in their own workspace.
resource identityOnWorkspace 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: workspace
  name: guid(workspace.id, identity.id, roles.azureMLDataScientist)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.azureMLDataScientist)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource dataScientistOnWorkspace 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(dataScientistPrincipalId)) {
  scope: workspace
  name: guid(workspace.id, dataScientistPrincipalId, roles.azureMLDataScientist)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.azureMLDataScientist)
    principalId: dataScientistPrincipalId
  }
}

// ------------------------------------------------------------------------------------------------------------
// Outputs: what the config's azure section needs

@description('Workspace name (azure.workspace_name).')
output workspaceName string = workspace.name

@description('Workspace resource id.')
output workspaceId string = workspace.id

@description('Resource group (azure.resource_group).')
output resourceGroupName string = resourceGroup().name

@description('Subscription (azure.subscription_id).')
output subscriptionId string = subscription().subscriptionId

@description('Client id of the jobs\' managed identity (azure.identity_client_id).')
output identityClientId string = identity.properties.clientId

@description('Principal id of the jobs\' managed identity.')
output identityPrincipalId string = identity.properties.principalId

@description('Key Vault URI; the teacher key secret is <uri>secrets/teacher-key (azure.teacher_key_secret).')
output keyVaultUri string = keyVault.properties.vaultUri

@description('Names of the compute clusters (azure.compute.cpu / gpu).')
output clusters array = [
  cpuCluster.name
  gpuCluster.name
]
